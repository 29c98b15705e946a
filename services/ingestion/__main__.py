import sys

from services.ingestion.main import main

sys.exit(main())
