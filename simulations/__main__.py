import sys

from corrosion.ops.pipes import closed_stdout_exits

from .cli import main

with closed_stdout_exits():  # `python -m simulations scenarios | head`: exit 1, no traceback
    sys.exit(main())
