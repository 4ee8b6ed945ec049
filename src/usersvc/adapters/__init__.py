"""Everything that talks to the outside: database, hashing, tokens."""
