"""``python -m walstore`` runs the command line."""
from .cli import main

main()
