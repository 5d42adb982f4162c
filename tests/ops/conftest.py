import pathlib
import sys

# resnet_shapes.py is a test helper beside these tests, not part of the package.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
