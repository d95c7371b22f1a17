"""Asset checks derived from governance/policy.yaml."""
