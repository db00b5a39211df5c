/**
 * Process-wide cleanup of temporary outputs and child processes. On SIGINT/SIGTERM the CLI runs
 * every registered action before exiting, so an interrupted run leaves nothing half-written.
 */
type Action = () => Promise<void> | void;

const actions = new Set<Action>();

/** Registers an action; returns a function that unregisters it. */
export function onCleanup(action: Action): () => void {
  actions.add(action);
  return () => {
    actions.delete(action);
  };
}

/** Runs every registered action once (newest first); errors are ignored: this is best effort. */
export async function runCleanup(): Promise<void> {
  const list = [...actions].reverse();
  actions.clear();
  for (const action of list) {
    try {
      await action();
    } catch {
      // best effort
    }
  }
}
