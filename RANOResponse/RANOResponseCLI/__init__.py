"""RANOResponseCLI: the ``rano-response`` program, which sits above both Lib packages.

The clinical core (:mod:`RANOResponseLib.cli`: predict, measure, review, report, bench, phantom)
never imports training code; this package adds ResponseTrainingLib's commands (train, evaluate,
input-stats) as a plugin. ``python -m RANOResponseCLI <command>`` is the same program as ``rano-response``.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from RANOResponseLib import cli as core
    from ResponseTrainingLib import cli as training

    return core.main(argv, plugins=(training.add_commands,))


if __name__ == "__main__":
    sys.exit(main())
