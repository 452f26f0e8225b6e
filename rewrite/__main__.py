"""`python -m rewrite …` (and `torchrun … -m rewrite …`) is the `rewrite` command."""
from rewrite.cli import main

main()
