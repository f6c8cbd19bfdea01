"""The write model: commands, the User aggregate and its rules. No I/O here."""
