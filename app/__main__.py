"""``python -m app COMMAND [ARGS]``: the same as ``cellseg COMMAND [ARGS]`` (:mod:`app.main`)."""

import sys

from app.main import main

sys.exit(main())
