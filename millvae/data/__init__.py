"""Preparing the milling data: sources, the MATLAB file, the simulator, regions, windows."""
