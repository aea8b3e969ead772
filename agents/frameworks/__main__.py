"""``python -m agents.frameworks KIND [python args...]``: run Python in framework KIND's own
environment, building it first when this node has not yet (``-c pass`` builds it ahead: an
image build, a node's start). See ``agents.frameworks.env``."""

import sys

from agents.frameworks.env import main

main(sys.argv)
