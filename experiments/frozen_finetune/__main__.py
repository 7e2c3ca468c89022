import sys

from .finetune import main

sys.exit(main())
