"""Durable campaign-node scheduler on Redis-backed BullMQ queues."""

__version__ = "0.1.0"
