"""`python -m refact_gguf …` is the `refact-gguf` command."""

from .cli import main

main()
