"""Our InfiniteTalk generator, run as a child process by `itk run`."""
