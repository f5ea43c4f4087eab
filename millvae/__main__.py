import sys

from millvae.cli import main

sys.exit(main())
