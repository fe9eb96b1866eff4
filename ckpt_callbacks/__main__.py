from ckpt_callbacks._cli import main

raise SystemExit(main())
