/**
 * Bearer tokens from a file the operator manages: one token per line (blank lines and `#`
 * comments ignored). The file is looked at on every request — a stat; it is parsed again only
 * when its size, mtime or inode changed — so adding or revoking a token takes effect at once,
 * without a signal or a restart. A presented token is compared with every accepted one as
 * sha256 digests with crypto.timingSafeEqual (equal lengths, no early exit), so neither the
 * content nor the length of a token leaks through timing.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { UsageError } from '../util/errors.js';

const digest = (s: string): Buffer => createHash('sha256').update(s, 'utf8').digest();

export class TokenFile {
  private digests: Buffer[] = [];
  private stamp = '';

  private constructor(readonly path: string) {}

  /** Opens the file; refuses a missing or empty one (a server that accepts nobody is a mistake). */
  static async open(path: string): Promise<TokenFile> {
    const t = new TokenFile(path);
    await t.refresh();
    if (t.digests.length === 0) throw new UsageError(`token file ${path} holds no token`, { path });
    return t;
  }

  private async refresh(): Promise<void> {
    const st = await stat(this.path).catch(() => undefined);
    const stamp = st ? `${st.ino}:${st.size}:${st.mtimeMs}` : 'missing';
    if (stamp === this.stamp) return;
    const text = st ? await readFile(this.path, 'utf8').catch(() => '') : '';
    this.digests = text
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !l.startsWith('#'))
      .map(digest);
    this.stamp = stamp;
  }

  /** Whether `presented` is one of the tokens in the file as it is now. */
  async accepts(presented: string | undefined): Promise<boolean> {
    await this.refresh();
    if (!presented) return false;
    const d = digest(presented);
    let ok = false;
    for (const t of this.digests) ok = timingSafeEqual(d, t) || ok;
    return ok;
  }
}

/** The token of an `Authorization: Bearer …` header, if that is what it is. */
export function bearer(header: string | undefined): string | undefined {
  const m = header ? /^Bearer[ ]+([\x21-\x7e]+)[ ]*$/i.exec(header) : null;
  return m?.[1];
}
