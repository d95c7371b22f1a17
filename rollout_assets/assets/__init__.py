"""Window assets by stage: collector → analyzer → reporter (seed §6)."""
