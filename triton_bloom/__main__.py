"""``python -m triton_bloom``: the ``triton-bloom`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
