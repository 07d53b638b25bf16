"""What this machine and installation provide: RAM (``ram``: peak resident memory, available
memory) and the optional packages of each job (``extras``).
"""
