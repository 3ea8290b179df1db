"""``python -m mmsec``: the same command line as the ``mmsec`` script (and the way torchrun
starts it: ``torchrun --nproc_per_node N -m mmsec attack ...``)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="mmsec")
