"""``python -m conversion`` is the ``resnet34-parity`` command."""

import sys

from conversion.cli import console_main

sys.exit(console_main())
