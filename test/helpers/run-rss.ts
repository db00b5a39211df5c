/**
 * Runs the CLI in this process and reports its peak RSS on the last stderr line
 * (`maxrss_kib=N`): the hostile-input tests check that crafted inputs stay bounded.
 * Usage: node dist/test/helpers/run-rss.js <cli arguments…>
 */
import { main } from '../../src/cli/main.js';

const code = await main(process.argv);
process.stderr.write(`maxrss_kib=${process.resourceUsage().maxRSS}\n`);
process.exitCode = code;
