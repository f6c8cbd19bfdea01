"""The query side: reads the Redis views the projections maintain."""
