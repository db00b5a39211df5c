/**
 * Exit codes of the cloudlet-overlay CLI: the one registry. Each has a name (errors.ts maps
 * every error class to one), a short label for `--help`, and the meaning docs/cli.md lists (a
 * test checks the table there against this). Scripts branch on these, so a code never changes
 * meaning once released.
 */
const REGISTRY = {
  ok: { code: 0, label: 'ok', meaning: 'done' },
  internal: {
    code: 1,
    label: 'internal error',
    meaning: 'a bug or an unclassified error (set `CLOUDLET_DEBUG=1` for a stack trace)',
  },
  usage: { code: 2, label: 'usage', meaning: 'bad flags or arguments' },
  notFound: {
    code: 3,
    label: 'not found',
    meaning: 'a named input (file, base, instance, URL 404) does not exist or cannot be read',
  },
  corrupt: {
    code: 4,
    label: 'corrupt input',
    meaning: 'an input is corrupt or truncated: overlay, image, memory snapshot, base package',
  },
  baseMismatch: { code: 5, label: 'overlay for another base', meaning: 'the overlay was made for another base VM' },
  verifyFailed: {
    code: 6,
    label: 'verification failed',
    meaning: "a rebuilt target does not match the overlay's checksum (damaged base?)",
  },
  unsupported: {
    code: 7,
    label: 'unsupported',
    meaning: 'a valid input uses something not supported (format version, stream capability)',
  },
  qemu: {
    code: 8,
    label: 'QEMU failed',
    meaning: 'QEMU failed: did not start, refused the memory snapshot, or died',
  },
  timeout: { code: 9, label: 'timeout', meaning: 'the VM (or a peer) did not answer in time' },
  busy: {
    code: 10,
    label: 'busy (port/base in use, output exists)',
    meaning:
      'a port is in use, a base is in use (by an instance or a running operation), an output already exists, ' +
      'a cloudlet is at its limit (HTTP 429)',
  },
  missingTool: {
    code: 11,
    label: 'tool missing',
    meaning: 'qemu-img / qemu-system-x86_64 / tar not found on PATH',
  },
  network: {
    code: 12,
    label: 'network',
    meaning: 'fetching an overlay failed: refused, HTTP error, stalled, too large; Glance or keystone unreachable',
  },
  untrusted: {
    code: 13,
    label: 'untrusted (signature)',
    meaning: 'unsigned, untrusted or badly signed overlay or base package while a trusted key is configured',
  },
  noSpace: {
    code: 14,
    label: 'no space',
    meaning: 'the file system that holds an output (named in the message) is full',
  },
  unauthorized: {
    code: 15,
    label: 'unauthorized',
    meaning: 'a cloudlet refused the request: no bearer token, or not one it accepts (HTTP 401)',
  },
  interrupted: {
    code: 130,
    label: 'interrupted',
    meaning: 'SIGINT/SIGTERM; partial outputs and started VMs were removed',
  },
} as const;

export type ExitCodeName = keyof typeof REGISTRY;

export interface ExitCodeEntry {
  name: ExitCodeName;
  code: number;
  /** A few words, for --help. */
  label: string;
  /** One sentence, for docs/cli.md. */
  meaning: string;
}

/** Every exit code, ascending. */
export const EXIT_CODES: readonly ExitCodeEntry[] = (Object.keys(REGISTRY) as ExitCodeName[])
  .map((name) => ({ name, ...REGISTRY[name] }))
  .sort((a, b) => a.code - b.code);

/** Exit code by name: `ExitCode.usage` is 2. */
export const ExitCode = Object.fromEntries(EXIT_CODES.map((e) => [e.name, e.code])) as {
  readonly [K in ExitCodeName]: (typeof REGISTRY)[K]['code'];
};

/** The exit codes as the paragraph at the end of `cloudlet-overlay --help`. */
export function exitCodesHelp(width = 88): string {
  const items = EXIT_CODES.map((e) => `${e.code} ${e.label}`);
  const lines: string[] = [];
  let line = 'Exit codes:';
  for (const [i, item] of items.entries()) {
    const word = ` ${item}${i === items.length - 1 ? '.' : ','}`;
    if (line.length + word.length > width) {
      lines.push(line);
      line = ' ';
    }
    line += word;
  }
  lines.push(`${line}  See docs/cli.md.`);
  return lines.join('\n');
}

/** The exit codes as the Markdown table of docs/cli.md. */
export function exitCodesTable(): string {
  const rows = EXIT_CODES.map((e) => `| ${e.code} | ${e.name} | ${e.meaning} |`);
  return ['| code | name | meaning |', '|---|---|---|', ...rows].join('\n');
}
