/** Runs async operations one at a time in call order, so a writer's state never interleaves. */
export class OpQueue {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(op: () => Promise<T>): Promise<T> {
    const p = this.tail.then(op);
    this.tail = p.catch(() => undefined);
    return p;
  }
}
