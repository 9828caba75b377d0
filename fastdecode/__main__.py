"""`python -m fastdecode ...` is the `fastdecode` command."""

import sys

from fastdecode.cli import main

sys.exit(main())
