"""Playbooks: operational procedures -- set-up scripts and the throwaway lab."""
