"""``python -m mmsec``: the CLI, as torchrun starts it (``torchrun ... -m mmsec attack ...``)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="mmsec")
