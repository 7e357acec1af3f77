"""Model families; importing registers their builders and losses."""
