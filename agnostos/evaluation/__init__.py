"""Evaluation: observation text, demo retrieval and ranking, agents, rollouts, scores."""
