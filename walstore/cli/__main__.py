"""``python -m walstore.cli`` runs the command line."""
from . import main

main(prog_name="walstore")
