"""`python -m longcat_flash.cli`, as the `longcat` command."""
from . import command

command()
