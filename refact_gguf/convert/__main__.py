"""`python -m refact_gguf.convert HF_DIR -o OUT [--quant LIST]`: the same as `refact-gguf convert`."""

import sys

from ..cli import app


def main() -> None:
    app(["convert", *sys.argv[1:]], prog_name="python -m refact_gguf.convert")


if __name__ == "__main__":
    main()
