"""``python -m mmsec``: the same command line as the ``mmsec`` script."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="mmsec")
