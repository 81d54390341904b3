"""``python -m prequal_middleware``: the ``prequal-gateway`` console script (see ``cli``)."""

from prequal_middleware.cli import main

raise SystemExit(main())
