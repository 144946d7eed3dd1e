import sys

from keras_gemma.cli import main

sys.exit(main())
