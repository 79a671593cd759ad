"""`kind-dit`, the command line: a command table (main.py) and one small module per command."""
