"""Errors of the FSM engine and the machine service.

Step authors raise :class:`AbortError` or :class:`UnrecoverableError` to halt a run (remaining steps
are skipped, finalizers run); any other exception is retried with backoff. The service errors carry
an HTTP status so the Machines API maps them without a table of its own.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every orchestrator error; ``status`` is the HTTP status the Machines API
    answers with (engine, driver and storage errors keep 500: they are not a client's fault)."""

    status = 500


# --- engine -------------------------------------------------------------------------------------


class HaltError(OrchestratorError):
    """A step error that stops the run instead of being retried."""

    kind = "halt"


class AbortError(HaltError):
    """The operation decided to stop (e.g. the machine is gone); not a failure of the system."""

    kind = "abort"


class UnrecoverableError(HaltError):
    """Retrying cannot help (bad image, invalid config, driver refused for good)."""

    kind = "unrecoverable"

    def __init__(self, message: str, *, user: bool = False) -> None:
        super().__init__(message)
        self.user = user


class AlreadyRunningError(OrchestratorError):
    """One active run per (machine, action): the caller learns which run holds the slot."""

    status = 409

    def __init__(self, machine_id: str, action: str, run_id: str) -> None:
        super().__init__(f"{action} is already running on machine {machine_id} (run {run_id})")
        self.machine_id = machine_id
        self.action = action
        self.run_id = run_id


class UnknownActionError(OrchestratorError):
    status = 400


class UnknownRunError(OrchestratorError):
    status = 404


class EngineClosedError(OrchestratorError):
    status = 503


# --- storage ------------------------------------------------------------------------------------


class StoreLockedError(OrchestratorError):
    """Another orchestrator process owns this machines directory."""


class UnknownMachineError(OrchestratorError):
    status = 404

    def __init__(self, machine_id: str) -> None:
        super().__init__(f"machine {machine_id} not found")
        self.machine_id = machine_id


class MachineExistsError(OrchestratorError):
    status = 409


# --- service ------------------------------------------------------------------------------------


class InvalidRequestError(OrchestratorError):
    """Malformed body, bad config value, unknown field: nothing was changed."""

    status = 400


class InvalidTransitionError(OrchestratorError):
    """The machine's state does not allow this operation now: nothing was changed."""

    status = 409


class LeaseError(OrchestratorError):
    """A lease is held and the request did not present its nonce (or presented a wrong one)."""

    status = 409


class NotFoundError(OrchestratorError):
    status = 404


class NotSupportedError(OrchestratorError):
    """The request is valid but this worker cannot serve it (its driver lacks the feature)."""

    status = 501
