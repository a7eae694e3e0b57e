"""One module per ``bnkit`` sub-command."""
