import sys

from comfy.quant.cli import main

sys.exit(main())
