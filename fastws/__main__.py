"""``python -m fastws ...``: the ``fastws`` command (``fastws serve``,
``fastws config show``, ``fastws check``, ``fastws bench``, ``--version``)."""

from fastws.cli.main import main

if __name__ == "__main__":
    main(prog_name="python -m fastws")
