"""Inter-process communication: the messages tiers exchange, and where they are sent.

Tiers never import one another; they share only these definitions.
"""
