import sys

from repavit.cli.main import main

sys.exit(main(["bench", *sys.argv[1:]]))
