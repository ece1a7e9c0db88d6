"""Start the finetune web app: `python app.py [options]` is the same as `finetune app [options]`."""

import sys

from finetune.webapp import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
