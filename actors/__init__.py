"""The trading domain built on ``supervisors``: venue connectors, risk books, counterparty
monitors (issue 3). Depends on ``supervisors``; nothing generic depends on it."""
