"""``mnv3-compress compare --recipes ...``: every variant made, measured together, and drawn as one trade-off."""
