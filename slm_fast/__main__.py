import sys

from slm_fast.cli import main

sys.exit(main())
