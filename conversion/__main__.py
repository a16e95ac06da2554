"""``python -m conversion`` is the ``resnet34-parity`` command."""

import sys

from conversion.cli import main

sys.exit(main())
