"""``python -m RANOResponseCLI``: the ``rano-response`` program."""

import sys

from RANOResponseCLI import main

sys.exit(main())
