"""The only package that knows SQL, file layout and formats."""
