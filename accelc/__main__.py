from accelc.cli import main

raise SystemExit(main())
